"""The report's items by file stem, with their short titles: light enough for the workflow to
import while it builds its DAG (spbench.reports needs pandas and seaborn)."""

#: Short titles of the report's items (tables and figures), by file stem.
ITEM_TITLES: dict[str, str] = {
    "table2": "Table 2", "table3": "Table 3", "paired": "Paired differences", "selection": "Model selection",
    "overhead": "Overhead", "fig1": "Fig. 1", "fig2": "Fig. 2", "fig3": "Fig. 3", "fig4": "Fig. 4",
    "ranks": "Ranks across tasks", "cd": "Critical differences", "published": "Published numbers",
    "report": "Whole report",
}


def item_title(name: str) -> str:
    """The short title of a report item ("Table 2", "Fig. 3"); unknown names come back as given."""
    return ITEM_TITLES.get(name, name)
