"""One module per API family (KoboldAI and KoboldCpp, OpenAI, Ollama, Anthropic, Responses, admin and slots,
operational), over common.py. Each route is a function (app, request) -> Response.
"""
