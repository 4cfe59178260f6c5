"""The Lab's parts (composed by `Lab` in ui/callbacks.py): one file per panel or tab, plus the state they share."""
