"""Reports: tables and figures from evaluation results."""
