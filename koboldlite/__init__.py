"""KoboldLite: a local LLM server for GGUF models, as a package of modules (being split out of monolith.py).

For the time of the split the package's names are its modules' names, as koboldlite.py's were.
"""

import importlib as _importlib

for _name in ('version', 'errors', 'model_files', 'config', 'desktop', 'text', 'fields', 'generation', 'jobs', 'engine.gguf_layout', 'engine.gpu', 'engine.llama_model', 'engine.samplers', 'engine.embeddings', 'engine.drafting', 'engine.slots', 'engine.prompt_cache', 'engine.kv_pool', 'engine.read_ahead', 'engine.engine', 'scheduler', 'chat.template', 'chat.messages', 'chat.tools', 'service.downloads', 'service.catalog', 'service.served_model', 'service.roster', 'service.app', 'service.exchange', 'api.common', 'api.kobold', 'api.openai', 'api.ollama', 'api.anthropic', 'api.responses', 'api.admin', 'api.slots', 'api.ops', 'web.router', 'web.static', 'web.routes', 'web.connections', 'web.access', 'web.server', 'web.handler', 'main'):
    globals().update({k: v for k, v in vars(_importlib.import_module('.' + _name, __name__)).items()
                      if not k.startswith('__')})
