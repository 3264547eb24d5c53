"""Tools over the library (layer: applications): the memory planner behind `python -m lwm.memory` and the
Hugging Face conversion behind `python -m lwm.convert`."""
