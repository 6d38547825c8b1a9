"""Special-function units: each executes one or more ``hw.isa`` opcodes on the scratchpad, with the
unit interface of ``hw.sfu.base`` and a behavioural cycle model (``cycles``) beside it."""
