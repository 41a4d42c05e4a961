"""Report rows and every report writer (markdown, JSON, CSV, PNG); imports no engine.

rows.py: RowResult, ranking, shared tables; table1.py: `wbc evaluate`; external.py: `wbc evaluate
--external`; ablate.py: `wbc ablate`; robustness.py: `wbc robustness`. The HTML report is
wbc/report_html.py.
"""
