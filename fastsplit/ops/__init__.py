"""The ops: references, autograd Functions, torch.library registrations, dispatch."""
