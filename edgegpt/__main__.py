from edgegpt.cli.app import main

main()
