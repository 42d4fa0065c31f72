"""Attribution: modality Shapley values, within-modality attributions, reports."""
