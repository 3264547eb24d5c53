"""Small pieces every layer may use (layer: foundation): locked config updates (config_dict.py), the one dtype
table (dtypes.py), the one tree validator (trees.py), restricted unpickling (safe_pickle.py), pixels in and
out of images and videos (vision_io.py), the progress bar (progress.py) and the logging set-up (logs.py)."""
