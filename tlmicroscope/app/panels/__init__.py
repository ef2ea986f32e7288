"""One panel per analysis family; importing a panel registers its report sections.

``lens`` (prediction trajectories, the logit-lens table), ``microscope`` (the LLM-Microscope
panels), ``token_geometry``, ``latent`` (latent geometry) and ``causal`` (the causal basis).
The same builders serve ``tlmicroscope report``, the dashboard and the family commands
(``tlmicroscope microscope``, ...), so each family's HTML is built in one place. Page order is
``tlmicroscope.app.sections.SECTION_MODULES``.
"""
