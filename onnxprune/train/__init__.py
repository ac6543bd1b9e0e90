"""Training on ONNX graphs: a differentiable torch copy of a graph and its write-back (needs the ``torch`` extra).

``onnxprune.train.bridge`` imports torch; this package itself does not, so ``import onnxprune.train`` stays cheap.
See docs/algorithms.md, "Differentiable copy of an ONNX graph".
"""
