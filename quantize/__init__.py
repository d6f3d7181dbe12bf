"""GPTQ: the quantization settings, calibration sets, the algorithm (GPTQ, RTN, GPTAQ, scale refit), the block
pipeline with resume, the checkpoint writer, and qwen-quantize.

`qwen_quant.quantize` is both this subpackage and the public function `qwen_quant.quantize(...)`:
importing a submodule rebinds the package attribute to this module, so the module itself is callable
and hands the call to `api.quantize`.
"""

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from qwen_quant.quantize.api import quantize

        return quantize(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
