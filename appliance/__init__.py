"""The appliance's processes: node server, CLI, config, REST API (KServe v2), metrics."""
