"""The other runtimes, side by side with edgegpt (the parts of benchmarks/runtimes.py): `setup` (the peers'
venvs and the llama.cpp build under WORK), `models` (each runtime's model made from one checkpoint), one driver
module per runtime (how its model is made and how it is run), `worker` (the measurement inside each fresh
process), `processes` (running and watching child processes) and `table` (medians, ratios and the printed
table); `llama_server` and `genai_speculative` serve serving.py and speculative.py the same way.

Imported by the entry points beside it, whose folder is first on sys.path when they run; every module imports
only the standard library at import time, because the worker processes import this package too and their cold
start is measured."""
