"""Inference: the one home for loading a model (`loader`), setting up the runtime (`runtime`) and generating
(`engine`), used by every entry point (lwm.text_chat, lwm.vision_chat, lwm.vision_generation, the needle evals)."""
