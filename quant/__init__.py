"""quant/: the PyTorch front end and, upstream of everything, the numeric formats and the integer
reference model (``quant.formats``, ``quant.reference``, ``quant.packing``) that the hardware is
checked against. This package never imports hw, sim, bitstream or accllm."""
