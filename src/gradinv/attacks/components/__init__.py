"""Parts that attacks are built from: gradient-matching objectives, priors, initialisations, replay."""
