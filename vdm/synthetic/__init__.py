"""The built-in synthetic corpus's scene grammar: attributes, captions, held-out pairs and rendering.

A leaf of the package (numpy only): data preparation renders scenes with it, and the attribute
evaluator in ``vdm.metrics`` reads generated videos against the same palette, shapes and motions.
"""
