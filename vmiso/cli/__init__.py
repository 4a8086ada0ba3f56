"""The vmiso command line: argparse subcommands that call the API and print."""
