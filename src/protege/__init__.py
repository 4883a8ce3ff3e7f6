"""protege: imitation, alignment and honest evaluation of chat models (see README)."""

import logging as _logging

# bitsandbytes (imported by PEFT whenever it is installed) looks up optional CPU kernels on the Hugging
# Face hub at import and warns on every command when offline; its built-in CPU path is what runs.
for _name in ("bitsandbytes.backends.cpu.ops", "kernels"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
