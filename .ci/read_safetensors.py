"""Opens burn-fabric's safetensors export with the `safetensors` package (PyTorch's format
library) and checks PyTorch's names and layout for the image_classifier MLP.

usage: python3 read_safetensors.py FILE
"""
import sys

from safetensors.numpy import load_file

tensors = load_file(sys.argv[1])
shapes = {name: tuple(t.shape) for name, t in tensors.items()}
expected = {
    "l1.weight": (256, 64), "l1.bias": (256,),
    "l2.weight": (256, 256), "l2.bias": (256,),
    "l3.weight": (10, 256), "l3.bias": (10,),
}
assert shapes == expected, shapes
assert all(str(t.dtype) == "float32" for t in tensors.values())
print(f"safetensors read {len(tensors)} tensors in PyTorch layout")
