import inspect, sys, importlib, re, textwrap
# print the forward (unwrapped) of named classes: module:Class
for spec in sys.argv[1:]:
    mod, cls = spec.split(":")
    m = importlib.import_module(f"transformers.models.{mod}.modeling_{mod}")
    c = getattr(m, cls)
    f = c.forward
    f = getattr(f, "__wrapped__", f)
    src = inspect.getsource(f)
    # strip docstrings and blank lines
    src = re.sub(r'"""[\s\S]*?"""', '', src)
    lines = [l for l in src.splitlines() if l.strip() and not l.strip().startswith("#")]
    print(f"---- {spec}")
    print("\n".join(lines))
