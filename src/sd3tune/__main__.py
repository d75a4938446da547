from sd3tune.cli import main

if __name__ == "__main__":
    main()
