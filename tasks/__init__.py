"""Stage logic: one module per stage (`tasks/stages.py` lists them), plain functions of the params."""
