"""The one command-line layer of every `python -m lwm.X` command (docs/cli.md); kept so by
tests/test_one_home.py::test_every_entry_point_goes_through_the_one_command_line_layer and
test_rule_holds[flag_parser] (no parser built outside lwm/cli).

  values.py   one parser per kind of value (--update_llama_config, --mesh_dim, --modality, --dtype, ...) and
              the original's spellings (ALIASES)
  flags.py    the original's `--a.b=value` flags on locked ConfigDicts; `usage` (what --help prints)
  command.py  `cli(prog, main, get_default_config, doc)`: --help, and the one error policy (one line, exit 2)
"""
