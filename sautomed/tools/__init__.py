"""Tools around the model: evaluate, info, statistics, previews, exports and the label table they share."""
