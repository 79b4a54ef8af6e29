"""How the embedded toy world was made: pretraining of its autoencoder, generator and judges.

    python -m research.toyworld.pretrain --out runs/toyworld [--device cuda] [--resume]

The runtime (loading the committed pipeline and judges, the world's renderer and concepts) lives in
`loldu_sd.toyworld`; nothing here is needed to use it.
"""
