"""Evaluating and using trained checkpoints: FID/SSIM (evaluate), segmenter scores
(evaluate_segmenter), image generation (generate), and what they share (inference).

It reads checkpoints and shards and knows its rank, but imports no training internals."""
