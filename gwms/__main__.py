from gwms.cli import main

main()
