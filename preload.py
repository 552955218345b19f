"""Forge reads this before the webui starts: FreeFuse's command-line flags."""


def preload(parser):
    parser.add_argument(
        "--freefuse-log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="how much FreeFuse prints on the console (default: INFO)",
    )
