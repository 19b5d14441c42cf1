"""Time load_model (first call dequantizes into an empty home; later calls read the cache)."""
import json, sys, time, resource
from pathlib import Path
from kvlib.engine.model import load_model
model, home, dtype = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
t = time.perf_counter()
lm = load_model(model, home, dtype=dtype)
s = lm.config_summary
print(json.dumps({"model": model, "dtype": dtype, "load_s": round(time.perf_counter() - t, 1),
                  "max_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
                  "kv_bytes_per_token": s["num_hidden_layers"] * s["num_key_value_heads"] * s["head_dim"] * 2 * lm.kv_dtype.itemsize,
                  "kv_dtype": str(lm.kv_dtype), **{k: s[k] for k in ("num_hidden_layers", "num_key_value_heads", "head_dim")}}))
