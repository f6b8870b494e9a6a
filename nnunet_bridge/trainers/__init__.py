"""nnU-Net trainer classes of the bridge.

nnU-Net looks trainers up BY NAME: it imports every module of the folders listed in
``nnUNet_extTrainer`` as a top-level module. :func:`nnunet_bridge.env.nnunet_environment`
points that variable at this folder, so its modules must import only nnunetv2, torch and
the standard library (never ``nnunet_bridge``), and their names must be unique on sys.path.
"""
