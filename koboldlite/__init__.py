"""KoboldLite: a local LLM server for GGUF models.

Serves a model through llama-cpp-python's low-level bindings to KoboldAI Lite, SillyTavern and other KoboldCpp
clients, to anything that speaks the OpenAI, Ollama or Anthropic API, and to its own browser page, over plain HTTP
or TLS. `koboldlite.py` beside this package is the command users type; `python3 tools/build_single.py` joins the
modules below, in this order, into the one file that ships (dist/koboldlite.py), as SQLite ships sqlite3.c.

Layers, bottom to top. A module uses only the modules listed before it (tests/test_layers.py checks it, and the
joined file relies on it); nothing here imports a module, so importing one module loads only what it needs.

  base        version numbers; the errors every layer raises; where the program's own files are
  config      model files and their names; the configuration (command line, config file, presets); the
              double-click start of the executable
  requests    text assembly (UTF-8, stop strings, thinking blocks, banned phrases); typed body fields; images
              and audio checked by their bytes, fetched from an address only as --mediaurls allows; the one
              generation request every API turns into; jobs and the token buffer their readers wait on
  scheduler   the fair queue in front of an engine, known only by its protocol, and the thread that runs it
  engine      llama.cpp: how its threads wait and the process's priority, the cores worth a thread, the other
              programs' load, and the thread counts that follow it; the build loaded and its CPU variant, a
              GGUF's layout, the context it gets and its GPU fit, the loaded model, its LoRA adapters,
              fill-in-the-middle prompts, its multimodal projector, samplers, embeddings, speculative drafting,
              slots, the prompt cache, the KV pool, the next turn read ahead, the engine's steps, and
              conversations saved from its slots
  chat        chat templates, chat messages, JSON cut short, tool calls
  service     downloads, the model catalog, a served model, the roster of loaded models, the App, and what a
              route sees of a request (Request) and returns (Response); no HTTP
  api         one module per API family over api/common.py; each route is a function (app, request) -> Response
  web         the HTTP layer: router and route table, the page's files, connection watchers, access policy,
              the server with TLS around its listening socket, the request handler
  main        start-up and shutdown
"""

LAYERS = {
    "base": ("version", "errors", "paths"),
    "config": ("model_files", "config", "desktop"),
    "requests": ("text", "fields", "media", "media_urls", "generation", "jobs"),
    "scheduler": ("scheduler",),
    "engine": ("engine.cpu_policy", "engine.cpu_topology", "engine.windows_load", "engine.system_load",
               "engine.cpu_threads", "engine.threadpool", "engine.llama_build", "engine.gguf_layout",
               "engine.context_fit", "engine.gpu", "engine.llama_model", "engine.adapters", "engine.infill",
               "engine.projector", "engine.samplers", "engine.embeddings", "engine.drafting", "engine.slots",
               "engine.prompt_cache", "engine.kv_pool", "engine.read_ahead", "engine.preparation", "engine.replies",
               "engine.admission", "engine.engine", "engine.saved_slots"),
    "chat": ("chat.template", "chat.messages", "chat.partial_json", "chat.tools"),
    "service": ("service.downloads", "service.catalog", "service.served_model", "service.roster", "service.app",
                "service.exchange"),
    "api": ("api.common", "api.reply", "api.choices", "api.kobold", "api.openai", "api.ollama", "api.infill",
            "api.anthropic", "api.responses", "api.audio", "api.admin", "api.slots", "api.ops"),
    "web": ("web.ui_files", "web.router", "web.static", "web.routes", "web.connections", "web.access", "web.server",
            "web.handler"),
    "main": ("main",),
}
