"""Reading cases from disk: MSD/nnU-Net NIfTI and UA-MT h5, splits, validation, a synthetic generator."""
