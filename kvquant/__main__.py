from kvquant.cli.main import main

main()
