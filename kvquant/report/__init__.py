"""``kvquant report``: Markdown report with tables, plots and Pareto fronts from benchmark results."""

from kvquant.report.build import build_report
from kvquant.report.load import Results, load_results
from kvquant.report.pareto import pareto_mask, tradeoff_points

__all__ = ["Results", "build_report", "load_results", "pareto_mask", "tradeoff_points"]
