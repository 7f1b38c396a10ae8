from latentforge.track.progress import TrainProgress, shown_in, tracked


def test_an_evaluation_bar_shows_below_the_running_one_while_its_items_last():
    progress = TrainProgress(10, 0, enabled=True, description="train")
    try:
        with shown_in(progress):
            seen = []
            for item in tracked(range(3), "eval test"):
                bars = {task.description: task for task in progress.progress.tasks}
                assert bars["eval test"].completed == item and bars["eval test"].total == 3
                seen.append(item)
        assert seen == [0, 1, 2]
        assert [task.description for task in progress.progress.tasks] == ["train"]
    finally:
        progress.close()


def test_an_abandoned_evaluation_takes_its_bar_with_it():
    progress = TrainProgress(10, 0, enabled=True)
    try:
        with shown_in(progress):
            for _ in tracked(range(3), "eval test"):
                break
        assert [task.description for task in progress.progress.tasks] == ["train"]
    finally:
        progress.close()


def test_without_a_shown_bar_the_items_pass_through():
    assert list(tracked([4, 5], "eval test")) == [4, 5]
    with shown_in(TrainProgress(10, 0, enabled=False)):  # --quiet
        assert list(tracked([4, 5], "eval test")) == [4, 5]
