from embfilter_cli.cli import main

main()
