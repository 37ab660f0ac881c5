"""Text generation on the coordinator: requests, the token loop, the OpenAI and Triton routes."""
