from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    try:
        return version("sparsek")
    except PackageNotFoundError:
        return "0+unknown"
