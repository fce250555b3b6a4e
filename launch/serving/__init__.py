"""`qwen2vl-ap serve`: an OpenAI-compatible chat-completions server (FastAPI + uvicorn).

messages.py  the request schema, OpenAI content parts -> chat-template text + decoded media, with the limits
batcher.py   one model thread batching the requests that arrive together; per-request streams and stop rules
app.py       the HTTP routes, OpenAI JSON / SSE bodies and error format
launch/serve.py is the command (options, tensor-parallel relaunch, uvicorn).
"""
