"""3D-SAutoMed: slice attention, history tokens, box prompt generator, multi-class decoder, the network."""

from sautomed.models.sautomed.network import NetworkConfig, SAutoMedNet, State, StepOutput, build_network

__all__ = ["NetworkConfig", "SAutoMedNet", "State", "StepOutput", "build_network"]
