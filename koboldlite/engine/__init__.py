"""The llama.cpp engine: the model, its GPU fit, samplers, speculative drafts, slots, the KV pool, the
prompt cache and the step loop. Only the generation thread calls into a llama context.
"""
