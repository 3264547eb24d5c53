"""Inference: the one home for loading a model (`loader`), setting up the runtime (`runtime`) and generating
(`engine`), kept so by tests/test_one_home.py::test_rule_holds[model_loader], [runtime_setup] and [engine];
and the vision pieces shared by the vision entry points and the server (`vision`). Used by every inference
entry point (lwm.text_chat, lwm.vision_chat, lwm.vision_generation, the needle evals)."""
