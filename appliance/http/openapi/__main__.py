import sys

from appliance.http.openapi.document import openapi_yaml

sys.stdout.write(openapi_yaml())
