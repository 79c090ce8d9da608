"""The application's own tables (what its autogenerate compares against)."""

from sqlalchemy import Column, Integer, MetaData, Table, Text

metadata = MetaData()

widgets = Table(
    "app_widgets",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", Text, nullable=False),
)
