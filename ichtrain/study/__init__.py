"""Study-level modelling: experiments of K folds, stage 2 (sequence models over a study's slices), submissions."""
