"""`python -m agent` runs the edge-agent command."""

from agent.cli import main

main()
