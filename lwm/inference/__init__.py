"""Inference: the one home for loading a model (`loader`), setting up the runtime (`runtime`) and generating
(`engine`), and the vision pieces shared by the vision entry points and the server (`vision`), used by every entry point (lwm.text_chat, lwm.vision_chat, lwm.vision_generation, the needle evals)."""
