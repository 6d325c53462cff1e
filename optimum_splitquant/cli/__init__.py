"""The ``optimum-splitquant`` command line and its demo application (real offline data, model cards).

``commands`` (parser and entry point), ``quantize``, ``evaluate`` and ``demo`` (the commands),
``models`` (config, task, Auto class, tokenizer of the model a command works on), ``console``
(stdout and the ``error:`` line), ``card`` (the model card) and ``data`` (offline real data and scores).
``optimum-cli splitquant`` runs the same commands through :func:`main`
(``optimum/commands/register/register_splitquant.py``, installed with the package).
"""

from .commands import main

__all__ = ["main"]
