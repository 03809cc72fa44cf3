"""OmniSearchSage training (SPEC §1): train state, step, trainer, compile-only check, trained towers."""
