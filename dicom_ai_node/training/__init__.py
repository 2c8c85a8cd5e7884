"""Training the built-in CNNs in this repository (ct-lung): data, phantoms, a seeded training loop.

Nothing here runs in the node: the node only loads the weights and manifest this code writes. Data is
prepared with dicom_ai_node.infer.grid, the same functions the node uses at inference, so a network sees
identical grids and intensities in training and in production.
"""
