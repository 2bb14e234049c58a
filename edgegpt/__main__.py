from edgegpt.cli import main

main()
